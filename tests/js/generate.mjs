// Greedy generation with transformers.js from a local gatenorm ONNX folder, as a web/node app loads it.
// usage: node generate.mjs NODE_DIR FOLDER DTYPE MAX_NEW_TOKENS TEXT   -> prints {"prompt": [...], "new": [...]}
// NODE_DIR: the folder that `npm install @huggingface/transformers` installed into (holds node_modules/).
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [nodeDir, folder, dtype, maxNew, text] = process.argv.slice(2);
const entry = createRequire(path.join(path.resolve(nodeDir), "package.json")).resolve("@huggingface/transformers");
const { AutoModelForCausalLM, AutoTokenizer, env } = await import(pathToFileURL(entry).href);

env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(folder));
const name = path.basename(path.resolve(folder));
const tokenizer = await AutoTokenizer.from_pretrained(name);
const model = await AutoModelForCausalLM.from_pretrained(name, { dtype, device: "cpu" });
const inputs = tokenizer(text);
const out = await model.generate({
  ...inputs,
  max_new_tokens: Number(maxNew),
  min_new_tokens: Number(maxNew),
  do_sample: false,
});
const prompt = Array.from(inputs.input_ids.data, Number);
const all = Array.from(out.data, Number);
console.log(JSON.stringify({ prompt, new: all.slice(prompt.length), decoded: tokenizer.decode(all.slice(prompt.length)) }));
