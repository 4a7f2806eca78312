"""t3s_ray: continual LLM distillation with Training-Trajectory-Aware Token Selection on Ray."""

__version__ = "0.1.0"
