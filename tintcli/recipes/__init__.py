"""Recipes: what each `tint` subcommand does, as plain functions over a resolved config."""
