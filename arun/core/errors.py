"""The one exception type users see: a single line naming the problem and the fix."""


class ArunError(Exception):
    pass
