"""noports: secure remote access to TCP services on devices that open no inbound port."""

__version__ = "0.1.0"
