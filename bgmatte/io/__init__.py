"""Frames in and out: video with PyAV (`video`), still images and PNG output with OpenCV (`images`)."""
