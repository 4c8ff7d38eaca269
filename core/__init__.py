"""The hub's ground floor: facts every package shares and nothing below it.

- `exceptions`: the root exception (`HubError`) and configuration errors;
- `settings`: the typed, frozen settings of each concern, and `load_settings()`, the one place the
  environment is read;
- `contract`: the event kinds, topic names and their parsing, and message keys.

It imports nothing of the hub; every other package may import it.
"""
