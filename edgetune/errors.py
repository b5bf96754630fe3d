"""The one error type edgetune raises for problems a user can fix.

Every message names the problem and the fix in one line, so the CLI can print it as is (exit code 2)
and a desktop app can show it in a dialog without a traceback.
"""


class EdgetuneError(Exception):
    """A problem with the user's input or environment, with the fix in the message.

    Args:
        problem: what is wrong, naming the offending value.
        fix: what the user should do about it.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}")
