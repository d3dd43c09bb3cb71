"""``optimize tune``: the serving configuration of a bundle, chosen by measuring the real server on
this machine (``search``), and what people read of it (``report``)."""
