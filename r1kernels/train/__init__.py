"""Training loops composed from r1kernels ops, each op checked against its reference as it trains."""
