"""What a daemon serves on ``--http``: ``/metrics`` (Prometheus), ``/health``, and on a
master the live cluster page (``/``) and ``/status.json``.

* :mod:`skyproto.web.metrics`: collectors that read the daemons' live objects at scrape time;
* :mod:`skyproto.web.health`: whether a daemon is serving, and why not;
* :mod:`skyproto.web.status`: the master's table as JSON (also ``skyproto status --json``);
* :mod:`skyproto.web.page`: the cluster page;
* :mod:`skyproto.web.site`: the resource tree and the service that runs it;
* :mod:`skyproto.web.address`: the ``--http`` option (loopback unless told otherwise).

Nothing here imports the global reactor: the clock is passed in.
"""
