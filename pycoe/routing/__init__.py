"""pycoe.routing"""
