"""Code the sidecar and the operator both use, and neither side's runtime: the SecretInjection
spec (model, parser, hosts, signing), the CA, CIDRs. It imports nothing of either side, nor
aiohttp, kopf or the Kubernetes client (import-linter checks)."""
