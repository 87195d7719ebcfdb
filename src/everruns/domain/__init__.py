"""The pure core: values, rules and the workflow replay engine.

Nothing here performs I/O or imports trio, asyncio, SQL drivers or protobuf code; time and
randomness come in as arguments, which is what lets all of it be tested by the thousands.
"""
