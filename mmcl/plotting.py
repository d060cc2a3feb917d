"""matplotlib for the PNGs mmcl writes (report, benches, sample optimization): the file-only
Agg backend, so plotting never needs a display; matplotlib is an optional extra (mmcl[plot])."""


def agg_pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def agg_pyplot_or_none():
    """agg_pyplot(), or None when matplotlib is not installed (the caller skips its PNG)."""
    try:
        return agg_pyplot()
    except ImportError:
        return None
