"""Frames in and out: video with PyAV (`video`), still images and PNG output with OpenCV (`images`), cameras
(`webcam`), and the rules every output file follows (`files`)."""
