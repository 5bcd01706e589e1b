"""A streamer that records what `generate` hands it, for the streaming tests of recurrent and Jacobi decoding."""

from transformers.generation.streamers import BaseStreamer


class StreamRecorder(BaseStreamer):
    """Keeps every `put` (as lists) and whether `end` was called."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.ended = True
