"""Kafka and Faust: the stage runtime, one handler per stage, the timers, and the worker's wiring.

It runs `streams.domain` over messages; the domain never imports it.
"""
