"""HL7 v2 as integration engines speak it (versions 2.1 to 2.8): ORU^R01 laboratory results
become FHIR R4 Observation and DiagnosticReport records (`oru`), ADT registers, updates and
merges patients (`adt`, `registry`), over MLLP (`mllp`) or from files, one message or a batch
(`batch`) at a time, each message in one ledger transaction, answered in original mode (AA, AE,
AR) or enhanced mode (CA, CE, CR) with warnings as ERR segments of severity W (`ack`).

Messages are parsed with python-hl7 (`hl7` on PyPI), which also builds the acknowledgements
and reads batch structure.
"""
