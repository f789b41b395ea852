"""The piped ring: nodes that run one model together, each holding only its layer windows.

Every node (``node.py``) admits the cluster's links, holds the windows the plan gives it and
runs the activation frames that reach it (``node_frames.py``) on its model thread, answering
the head's control requests (``node_control.py``) on its event loop. The head node also runs the
cluster (``head.py``): who is in it (``members.py``), the plan and what the ring measures
(``planning.py``, Halda), the status view (``view.py``); and the generation loop's executor
(``ring.py``), which sends each chunk k times around the ring through ``head.HeadRingLink``.

Threads: every node has one event loop (links, control, discovery) and one model thread (its
windows; on the head also the generation loop and the ring executor). The model thread never
awaits: it hands frames and requests to the event loop and waits for their answers, as
``ring.py`` pictures for one ring round. Frames carry the plan's number, so no node runs a frame
of an older plan; a failed or stalled node ends the request with a RingError naming it, and the
ring is planned again before the next request.
"""
