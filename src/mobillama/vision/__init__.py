"""MobiLlama-V: CLIP/SigLIP encoder + projector + MobiLlama decoder; vision data; training stages."""
