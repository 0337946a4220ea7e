"""HL7 v2 laboratory results: ORU^R01 messages (v2.3–2.5.1) received over MLLP or read from
files, mapped to FHIR R4 Observation and DiagnosticReport records and written to the ledger in
one transaction per message, answered with an ACK (AA) or a NAK (AE, AR).

Messages are parsed with python-hl7 (`hl7` on PyPI), which also builds the acknowledgements.
"""
