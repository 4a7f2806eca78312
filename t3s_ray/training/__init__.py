"""One training rank, without Ray but for its session: what the driver hands it (``spec``), what it does
(``trainer``), and the seams of that (``module``, ``steps``, ``online``, ``metrics``, ``sessions``).
``t3s_ray.worker`` re-exports the names of before. Nothing is imported here, so that the driver can
import the spec without the trainer."""
