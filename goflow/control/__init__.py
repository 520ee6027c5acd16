"""The coordinator's control socket: request/reply framing, client calls and error kinds."""
