"""The checkpoint folder: writing it safely, what it holds, inspecting it, its model card and the Hub."""
