"""Running the server with Envoy in front: Envoy's config and process, replicas."""
