"""A plugin whose handler is not async: the decorator refuses it at import."""

from worker.plugin import HandlerContext, handler


@handler("sync")
def sync(ctx: HandlerContext) -> None:  # type: ignore[arg-type]
    pass
