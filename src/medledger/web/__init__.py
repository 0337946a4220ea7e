"""The web portal and ledger explorer each node serves under /portal: patients, clinicians and
auditors sign in with their own keystore, and every action goes through the same SDK calls,
and so the same ledger rules, as the CLI and the API."""
