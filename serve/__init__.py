"""The serving side: loads a bundle and serves its Runner."""
