class InvalidRecord(ValueError):
    """Input that fails validation; `reason` is the dead-letter reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def check_unicode(value: str, field: str) -> str:
    """JSON escapes can spell lone surrogates ("\\udc00"), which no UTF-8 file, protobuf or
    tokenizer accepts: such a field is a dead letter here, not a crash in a later stage."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRecord("invalid_unicode", f"{field!r} holds a lone surrogate at character {error.start}") from None
    return value
