"""KV data plane pieces shared by the kvtransfer service, the workers and the vLLM connector."""
