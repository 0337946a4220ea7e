"""The node's use cases, shared by every front door (FHIR, HL7, the portal, bulk import and
export, the native API) and called in-process.

The SDK (`medledger.client`) is what external clients with their own keys use: they reach a
node through CometBFT's RPC and its HTTP API. The node's own front doors act for custodial
members on the same node, so they do the same through this layer without leaving the process:
committed state is read from the node's store (`CommittedView`, a snapshot at the last
committed height), packages are written to and read from the local package store, this node's
key share is released in-process, and a commit is learned of from the application itself
(`CommitNotices`). Transactions still reach the mempool through CometBFT, and the other
custodians' shares still come over their HTTP APIs. Every ledger rule lives in
`medledger.ledger`; this layer calls it and never restates it.
"""
