class InvalidRecord(ValueError):
    """Input that fails validation; `reason` is the dead-letter reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
