"""``handlens audit``: one report on whether a model can be trusted, to send to a colleague.

It judges a bundle on a subset of its split (``test`` by default) and gathers every check that can fail
a user's trust, each with its verdict in words: file-attribute baselines (size, mode, format) against the
model, train/test copies, where the maps' energy sits per class (outside the ROI, on the border),
burned-in marks and whether the maps sit on them, and the faithfulness verdict on a sample of images,
with the overlays of the worst cases. Computing (:mod:`handlens.audit.report`) is apart from drawing
(:mod:`handlens.audit.html`).
"""
