"""NVIDIA DALI video pipelines (SPEC §4): the `--decoder dali` data path.

`dali_pipelines.video.DaliClipLoader` is `prodistill.data.ClipLoader` with decoding, resize, crop and
normalisation in DALI (NVDEC on the GPU: H.264, HEVC, AV1, VP8/VP9, MJPEG; libavcodec on the CPU:
VP8/VP9/MJPEG only) and the same clips, order, sharding and resumable state; `decode_clip` decodes given
frames for parity checks. DALI is imported only when a pipeline is built; without it those raise an
ImportError that names `pip install 'prodistill[dali]'`. The PyAV path in `prodistill.data` is the
reference and the fallback.
"""
