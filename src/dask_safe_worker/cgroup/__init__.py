"""Reading, locating, parsing, writing, claiming and leaving memory cgroups."""
