"""The regional data standard: Avro schemas (`avro/*.avsc`) and the one module that knows the wire format."""
