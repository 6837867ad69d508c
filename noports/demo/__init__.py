"""``noports demo``: the whole stack (atserver, srvd, npd, npt and a web service) on this
machine, used and measured -- the README's "main job".  See :mod:`noports.demo.stack`."""
