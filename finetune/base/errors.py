"""The one exception every light module raises for the user's mistakes (no imports: anyone may use it)."""


class UserError(Exception):
    """A mistake of the user's (recipe, data, flags, run folder): its message is one sentence naming
    what and where, shown as it is, without a traceback, with exit code 2."""
