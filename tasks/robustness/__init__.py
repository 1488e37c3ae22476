"""Attacks on the student and its public teacher, the robustness check's parts and the promotion verdict."""
