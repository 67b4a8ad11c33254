# Longest task id, document id or document key (`{file}:{line}`), in characters: an id is copied
# into every record of every hook and view and into the commit records, so a 200 KB id made 240 MB
# of output from 16 tiny tests. Sample ids add at most a view/test or window suffix to one of these.
MAX_ID_CHARS = 1024


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


def check_id(value: str, field: str) -> str:
    """An id within MAX_ID_CHARS and valid Unicode; else the record is a dead letter."""
    if len(value) > MAX_ID_CHARS:
        raise InvalidRecord("id_too_long", f"{field!r} is {len(value)} characters long, over {MAX_ID_CHARS}")
    return check_unicode(value, field)
