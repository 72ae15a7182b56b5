# The ACL policy of the token meshdns uses on Consul Enterprise, to follow every admin
# partition and namespace (catalog.consul.partitions: ["*"], namespaces: ["*"]). Create it in
# the default partition:
#
#   consul acl policy create -partition default -name meshdns -rules @meshdns-policy-enterprise.hcl
#
# Read-only; see meshdns-policy.hcl for what each rule is for.

# /v1/partitions lists only the partitions a token may read; operator read lists them all.
operator = "read"
peering = "read"
mesh = "read"

agent_prefix "" {
  policy = "read"
}

partition_prefix "" {
  # Nodes belong to a partition, not to a namespace.
  node_prefix "" {
    policy = "read"
  }
  # /v1/peerings of each partition.
  peering = "read"
  mesh = "read"
  namespace_prefix "" {
    service_prefix "" {
      policy = "read"
    }
    query_prefix "" {
      policy = "read"
    }
  }
}
