"""The teachers, the student network, saving and loading it, the transforms and inference: everything the Bento needs."""
