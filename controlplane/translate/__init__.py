"""Pure translation to Envoy resources: no clock, no client, no randomness."""
