"""Pure processing: normalise, identity, rules, escalation and their reference data.

No Kafka, no Faust, no clock, no database: records and state in, records and state out, so every
rule is tested with plain values. Bad input raises `streams.exceptions.RejectedEvent` naming the field.
"""
