"""The planner: memory and step time of a layout predicted before it runs (`ringpipe plan`)."""
