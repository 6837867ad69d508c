"""The atProtocol: names, .atKeys files, crypto, the sans-IO wire codec and the async client."""
