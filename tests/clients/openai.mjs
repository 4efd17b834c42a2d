// The OpenAI Node SDK as an agent uses it, through keyhole's base-URL mode.
// usage: node openai.mjs BASE_URL MODEL stream|json|budget
// Prints {"text", "usage"} or, when the SDK throws, {"error": {"name", "status", "code"}}.
import OpenAI from 'openai';

const [baseURL, model, how] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: 'placeholder', maxRetries: 0 });
const messages = [{ role: 'user', content: 'Paris?' }];
try {
  if (how === 'stream') {
    const stream = await client.chat.completions.create({
      model, messages, stream: true, stream_options: { include_usage: true },
    });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
    console.log(JSON.stringify({ text }));
  } else {
    const answer = await client.chat.completions.create({ model, messages });
    console.log(JSON.stringify({ text: answer.choices[0].message.content }));
  }
} catch (error) {
  console.log(JSON.stringify({
    error: { name: error.constructor.name, status: error.status, code: error.code },
  }));
}
