"""The gateway: OpenAI-compatible HTTP and gRPC servers over one async engine interface."""
