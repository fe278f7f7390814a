"""The collectives: every exchange between ranks, bounded by a timeout and named in its errors;
the phase board and the agreements that turn a rank doing something else into a clear error."""
