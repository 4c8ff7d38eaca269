"""Gateways for what hospitals already send: HL7 v2 over MLLP (`mllp.py`, parsing and mapping in `hl7/`),
FHIR R4 over HTTP (`fhir/`) and CSV exports (`csv_import.py`). Each turns messages into regional events
and publishes them through the SDK's publisher (validated, acks=all, idempotent); what they share is in
`common.py`."""
