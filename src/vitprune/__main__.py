"""``python -m vitprune …`` (what ``torchrun -m vitprune train …`` runs)."""
from .cli import main

main()
