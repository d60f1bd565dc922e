"""Evaluation of a distilled student on real video (`prodistill eval`): FVD against held-out clips, CLIP image
similarity to the conditioning frame and temporal consistency, student and teacher on the same clips and noise.

`frechet` holds the Fréchet distance and the feature statistics (cached with `--real-stats`), `features` the
extractors (I3D from a local TorchScript file for FVD; CLIP from the teacher's own image encoder or a local
folder), `run` the evaluation itself. Nothing is downloaded: without `--i3d` a tiny random-init video network
stands in, which runs the same code but gives numbers comparable only to other runs with that stand-in.
"""
