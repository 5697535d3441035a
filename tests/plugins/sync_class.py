"""A class-style plugin whose handle is not async."""

from worker.plugin import Handler, HandlerContext


class SyncClass(Handler):
    name = "syncclass"

    def handle(self, ctx: HandlerContext) -> None:  # type: ignore[override]
        pass
