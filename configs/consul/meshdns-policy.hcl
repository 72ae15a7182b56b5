# The ACL policy of the token meshdns uses (Consul CE, or the default partition of Consul
# Enterprise). Read-only, and only what the endpoints meshdns calls need:
#
#   consul acl policy create -name meshdns -rules @meshdns-policy.hcl
#   consul acl token create -description meshdns -policy-name meshdns
#
# Then put the token's SecretID in catalog.consul.token_file.

# /v1/health/service, /v1/health/connect, /v1/health/state, /v1/catalog/*: instances are
# answered only when both the node and the service are readable; the rest is filtered out.
node_prefix "" {
  policy = "read"
}
service_prefix "" {
  policy = "read"
}

# /v1/peerings: the cluster peers and the services each imports.
peering = "read"

# /v1/config/sameness-group (sameness groups for failover).
mesh = "read"

# /v1/query: the prepared query names, so .query names can be told from typos. Executing a
# query runs with the token the query was created with.
query_prefix "" {
  policy = "read"
}

# /v1/agent/self: only when catalog.consul.datacenter is not set (meshdns asks the agent
# which datacenter it is in). Remove this rule when you set the datacenter.
agent_prefix "" {
  policy = "read"
}
