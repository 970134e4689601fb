"""Reserved; see DESIGN.md §3."""
