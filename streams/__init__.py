"""Faust stream processing: thin agents over plain functions that validate, normalise and alert."""
